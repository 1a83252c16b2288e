//! HashiCorp Vault and OpenBao Transit (the two speak the same API).
//!
//! ```no_run
//! # async fn demo() -> Result<(), envelope_core::Error> {
//! use std::sync::Arc;
//! use envelope_core::kms::vault::{VaultConfig, VaultKms};
//! use envelope_core::{Keyring, MemoryKeyStore};
//!
//! // VAULT_ADDR (or BAO_ADDR), VAULT_TOKEN (or BAO_TOKEN), optionally VAULT_NAMESPACE.
//! let kms = VaultKms::new(VaultConfig::from_env()?)?;
//! // The master key is MOUNT/KEY: the transit key `users` of the engine mounted at `transit`.
//! let keyring = Keyring::builder(kms, MemoryKeyStore::new()).cmk("transit/users")
//!     .build()?;
//! # Ok(()) }
//! ```
//!
//! # Calls
//!
//! A master key ("CMK" elsewhere in this crate) is a transit key, named `MOUNT/KEY`: the mount
//! path of a transit engine (which may itself contain `/`) and the key's name, for example
//! `transit/users`. Data keys come from `MOUNT/datakey/plaintext/KEY` (256 bits) and are
//! unwrapped with `MOUNT/decrypt/KEY`; `MOUNT/encrypt/KEY` wraps given key material (rewrap to
//! another key).
//!
//! # Encryption context
//!
//! Every call sends the canonical JSON of the [`EncryptionContext`] (base64) twice: as
//! `associated_data`, which binds the wrap of an ordinary `aes256-gcm96` key (the AES-GCM
//! additional data), and as `context`, which a key created with `derived=true` requires and
//! derives its per-context key from (non-derived keys ignore it). So both kinds of key work, and
//! under either one a wrapped key opens only under the exact context it was made with.
//!
//! Transit's own `rewrap` endpoint takes no `associated_data`, so it cannot move a key wrapped
//! this way to the key's newest version; [`KmsProvider::re_encrypt`] unwraps and wraps again
//! instead (the data key passes through this process's memory, as in every read).
//!
//! # Transport
//!
//! HTTPS (rustls) to [`VaultConfig::address`], with an optional extra CA certificate
//! (`VAULT_CACERT`). Plain `http://` is accepted only for a loopback host (a dev server),
//! unless [`VaultConfig::danger_allow_insecure_http`] is set; redirects are never followed (a
//! standby node's redirect would carry the token elsewhere). Network errors, HTTP 5xx (a sealed
//! or standby node) and 429 (a rate-limit quota) are retried with jittered exponential
//! back-off; nothing else is. No request or response body is ever logged.

use std::fmt;
use std::time::Duration;

use async_trait::async_trait;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use serde_json::{Value, json};
use zeroize::Zeroizing;

use crate::error::{Error, KmsError, KmsErrorKind, Result};
use crate::keys::KeyMaterial;
use crate::kms::http::{self, Retry};
use crate::kms::{EncryptionContext, GeneratedDataKey, KmsProvider};
use crate::secret::SecretString;

const PROVIDER: &str = "vault";

/// How to reach and authenticate to a Vault or OpenBao server.
#[derive(Clone)]
pub struct VaultConfig {
    /// The server's base URL, for example `https://vault.example.com:8200`. Plain `http://`
    /// is accepted only for a loopback host unless
    /// [`VaultConfig::danger_allow_insecure_http`] is set.
    pub address: String,
    /// The token, sent as `X-Vault-Token`. Its policy needs `update` on
    /// `MOUNT/datakey/plaintext/KEY` and `MOUNT/decrypt/KEY` (applications), plus
    /// `MOUNT/encrypt/KEY` for `envelope keys rewrap` onto this key.
    pub token: SecretString,
    /// The namespace (Vault Enterprise, OpenBao), sent as `X-Vault-Namespace`.
    pub namespace: Option<String>,
    /// A PEM CA certificate to trust besides the system's roots (a private CA).
    pub ca_certificate_pem: Option<Vec<u8>>,
    /// Accept `http://` for a host that is not a loopback address. Default `false`: responses
    /// carry plaintext data keys and requests carry the token.
    pub danger_allow_insecure_http: bool,
    /// How long one call may wait and how often it is tried ([`crate::kms::CallLimits`]).
    pub limits: crate::kms::CallLimits,
}

impl fmt::Debug for VaultConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VaultConfig")
            .field("address", &self.address)
            .field("token", &self.token)
            .field("namespace", &self.namespace)
            .field(
                "ca_certificate_pem",
                &self.ca_certificate_pem.as_ref().map(|_| "<set>"),
            )
            .field(
                "danger_allow_insecure_http",
                &self.danger_allow_insecure_http,
            )
            .field("limits", &self.limits)
            .finish()
    }
}

impl VaultConfig {
    /// A configuration for the server at `address` with `token` and default settings.
    pub fn new(address: impl Into<String>, token: impl Into<SecretString>) -> Self {
        VaultConfig {
            address: address.into(),
            token: token.into(),
            namespace: None,
            ca_certificate_pem: None,
            danger_allow_insecure_http: false,
            limits: crate::kms::CallLimits::default(),
        }
    }

    /// Read the server address from `VAULT_ADDR` (or `BAO_ADDR`) and the rest with
    /// [`VaultConfig::for_address_from_env`].
    ///
    /// # Errors
    /// [`Error::Config`] naming what is missing or unreadable.
    pub fn from_env() -> Result<Self> {
        let address = env_either("VAULT_ADDR", "BAO_ADDR").ok_or_else(|| {
            Error::config(
                "VAULT_ADDR",
                "is not set (nor BAO_ADDR): the Vault/OpenBao server's URL, for example https://vault.example.com:8200",
            )
        })?;
        Self::for_address_from_env(address)
    }

    /// A configuration for `address` whose token comes from `VAULT_TOKEN` (or `BAO_TOKEN`),
    /// namespace from `VAULT_NAMESPACE` (or `BAO_NAMESPACE`), and extra CA certificate from the
    /// PEM file named by `VAULT_CACERT` (or `BAO_CACERT`), when set.
    ///
    /// # Errors
    /// [`Error::Config`] when no token is set or the CA file cannot be read.
    pub fn for_address_from_env(address: impl Into<String>) -> Result<Self> {
        let token = env_either("VAULT_TOKEN", "BAO_TOKEN").ok_or_else(|| {
            Error::config(
                "VAULT_TOKEN",
                "is not set (nor BAO_TOKEN): Vault/OpenBao needs a token whose policy allows the transit calls (see docs/PROVIDERS.md)",
            )
        })?;
        let mut config = VaultConfig::new(address, SecretString::new(token));
        config.namespace = env_either("VAULT_NAMESPACE", "BAO_NAMESPACE");
        if let Some(path) = env_either("VAULT_CACERT", "BAO_CACERT") {
            config.ca_certificate_pem = Some(std::fs::read(&path).map_err(|e| {
                Error::Config(
                    crate::error::ConfigError::new(
                        format!("VAULT_CACERT {path:?}"),
                        "cannot be read",
                    )
                    .with_io(e),
                )
            })?);
        }
        Ok(config)
    }
}

fn env_either(a: &str, b: &str) -> Option<String> {
    [a, b]
        .iter()
        .find_map(|name| std::env::var(name).ok().filter(|v| !v.is_empty()))
}

/// A Vault/OpenBao Transit client. Cheap to share; reuses connections.
pub struct VaultKms {
    config: VaultConfig,
    retry: Retry,
    base: reqwest::Url,
    client: reqwest::Client,
}

impl fmt::Debug for VaultKms {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VaultKms")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// A master key name `MOUNT/KEY`, split.
struct KeyPath<'a> {
    mount: &'a str,
    key: &'a str,
}

impl<'a> KeyPath<'a> {
    fn parse(cmk: &'a str) -> std::result::Result<Self, KmsError> {
        let bad = || {
            KmsError::new(PROVIDER, KmsErrorKind::InvalidRequest).with_message(format!(
                "master key {cmk:?} is not MOUNT/KEY (the transit engine's mount path and the key's name, for example transit/users)"
            ))
        };
        let (mount, key) = cmk.rsplit_once('/').ok_or_else(bad)?;
        let segment_ok = |s: &str| {
            !s.is_empty()
                && s != "."
                && s != ".."
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        };
        if !segment_ok(key) || !mount.split('/').all(segment_ok) {
            return Err(bad());
        }
        Ok(KeyPath { mount, key })
    }
}

impl VaultKms {
    /// A client for `config`.
    ///
    /// # Errors
    /// [`Error::Config`] for an empty token, an unusable address or CA certificate, and for a
    /// plain `http://` address whose host is not a loopback address (unless
    /// [`VaultConfig::danger_allow_insecure_http`] is set).
    pub fn new(config: VaultConfig) -> Result<Self> {
        if config.token.is_empty() {
            return Err(Error::config("VaultConfig::token", "must not be empty"));
        }
        let base = http::endpoint(
            "Vault",
            "VaultConfig::danger_allow_insecure_http",
            &config.address,
            config.danger_allow_insecure_http,
        )?;
        if base.query().is_some() || base.fragment().is_some() {
            return Err(Error::config(
                format!("Vault address {:?}", config.address),
                "must not carry a query or fragment",
            ));
        }
        let roots = match config.ca_certificate_pem.as_deref() {
            None => Vec::new(),
            Some(pem) => match reqwest::Certificate::from_pem_bundle(pem) {
                Ok(certs) if !certs.is_empty() => certs,
                Ok(_) => {
                    return Err(Error::config(
                        "the Vault CA certificate",
                        "holds no PEM certificate",
                    ));
                }
                Err(e) => {
                    return Err(Error::config(
                        "the Vault CA certificate",
                        format!("is not a PEM certificate: {e}"),
                    ));
                }
            },
        };
        let client = http::client(
            config.limits.connect_timeout,
            config.limits.request_timeout,
            roots,
        )?;
        Ok(VaultKms {
            retry: Retry::new(
                config.limits.request_timeout,
                config.limits.max_attempts,
                config.limits.backoff,
            ),
            base,
            client,
            config,
        })
    }

    /// `{address}/v1/{mount...}/{op...}/{key}`, each part a URL path segment (never parsed as a
    /// path, so a name cannot climb out of its mount).
    fn url(&self, mount: &str, op: &[&str], key: &str) -> reqwest::Url {
        let mut url = self.base.clone();
        {
            // `endpoint` accepted only http(s) URLs with a host, which can always take a path.
            let Ok(mut segments) = url.path_segments_mut() else {
                unreachable!("http(s) URLs have paths")
            };
            // A base path's trailing slash would leave an empty segment before ours.
            segments.pop_if_empty().push("v1");
            segments.extend(mount.split('/'));
            segments.extend(op.iter().copied());
            if !key.is_empty() {
                segments.push(key);
            }
        }
        url
    }

    /// POST `body` to `url`, retrying what may succeed on a second try; the response's `data`.
    async fn call(
        &self,
        action: &str,
        url: reqwest::Url,
        body: Value,
    ) -> std::result::Result<Value, KmsError> {
        // Serialized once (and wiped afterwards: an Encrypt body holds a plaintext key).
        let body = Zeroizing::new(serde_json::to_vec(&body).map_err(|e| {
            KmsError::new(PROVIDER, KmsErrorKind::InvalidRequest).with_message(e.to_string())
        })?);
        self.retry
            .run(PROVIDER, action, || {
                self.attempt(action, reqwest::Method::POST, url.clone(), Some(&body))
            })
            .await
    }

    async fn attempt(
        &self,
        action: &str,
        method: reqwest::Method,
        url: reqwest::Url,
        body: Option<&[u8]>,
    ) -> std::result::Result<Value, KmsError> {
        let mut request = self
            .client
            .request(method, url)
            .header("X-Vault-Token", self.config.token.expose())
            .header("X-Vault-Request", "true");
        if let Some(ns) = &self.config.namespace {
            request = request.header("X-Vault-Namespace", ns);
        }
        if let Some(body) = body {
            request = request
                .header("Content-Type", "application/json")
                .body(body.to_vec());
        }
        let response = request
            .send()
            .await
            .map_err(|e| http::transport_error(PROVIDER, &e))?;
        let status = response.status();
        let bytes = http::read_capped(PROVIDER, response).await?;
        if status.is_success() {
            if bytes.is_empty() {
                return Ok(Value::Null);
            }
            let mut v: Value = serde_json::from_slice(&bytes)
                .map_err(|_| invalid_response(action, "response is not JSON"))?;
            return Ok(v.get_mut("data").map(Value::take).unwrap_or(Value::Null));
        }
        if status.is_redirection() {
            return Err(
                KmsError::new(PROVIDER, KmsErrorKind::InvalidResponse).with_message(format!(
                    "{action}: HTTP {status}: the server answered with a redirect (a standby node?), which is never followed; point VaultConfig::address at the active node or a load balancer"
                )),
            );
        }
        // `{"errors": ["..."]}`: short server messages, never key material.
        let message: String = serde_json::from_slice::<Value>(&bytes)
            .ok()
            .and_then(|v| {
                v.get("errors")?
                    .as_array()
                    .map(|errors| {
                        errors
                            .iter()
                            .filter_map(Value::as_str)
                            .collect::<Vec<_>>()
                            .join("; ")
                    })
                    .filter(|m| !m.is_empty())
            })
            .unwrap_or_else(|| "no error message".to_owned())
            .chars()
            .take(300)
            .collect();
        let kind = classify(status.as_u16(), &message);
        Err(KmsError::new(PROVIDER, kind)
            .with_code(status.as_u16().to_string())
            .with_message(format!("{action}: HTTP {status}: {message}")))
    }

    /// Create a transit key `MOUNT/KEY` of type `aes256-gcm96`; `derived` makes it derive a
    /// key per encryption context.
    ///
    /// # Errors
    /// The server's error.
    pub async fn create_key(&self, cmk: &str, derived: bool) -> Result<()> {
        let path = KeyPath::parse(cmk)?;
        self.call(
            "create key",
            self.url(path.mount, &["keys"], path.key),
            json!({"type": "aes256-gcm96", "derived": derived}),
        )
        .await?;
        Ok(())
    }

    /// Rotate the transit key `MOUNT/KEY`: new data keys are wrapped under its next version;
    /// keys wrapped under earlier versions still open until `min_decryption_version` passes
    /// them.
    ///
    /// # Errors
    /// The server's error.
    pub async fn rotate_key(&self, cmk: &str) -> Result<()> {
        let path = KeyPath::parse(cmk)?;
        self.call(
            "rotate key",
            self.url(path.mount, &["keys", path.key, "rotate"], ""),
            json!({}),
        )
        .await?;
        Ok(())
    }

    /// The transit key's configuration as the server reports it (`GET MOUNT/keys/KEY`):
    /// `latest_version`, `min_decryption_version`, `derived`, ...
    ///
    /// # Errors
    /// The server's error.
    pub async fn read_key(&self, cmk: &str) -> Result<Value> {
        let path = KeyPath::parse(cmk)?;
        let url = self.url(path.mount, &["keys"], path.key);
        Ok(self
            .retry
            .run(PROVIDER, "read key", || {
                self.attempt("read key", reqwest::Method::GET, url.clone(), None)
            })
            .await?)
    }
}

/// The text sent as both `context` and `associated_data`.
fn context_b64(context: &EncryptionContext) -> String {
    STANDARD.encode(context.canonical_json())
}

/// Map an error response to the kind of failure it is. Vault has no error codes: the status
/// and the message tell.
pub(crate) fn classify(status: u16, message: &str) -> KmsErrorKind {
    let has = |s: &str| message.contains(s);
    match status {
        401 | 403 => KmsErrorKind::Auth,
        429 => KmsErrorKind::Throttled,
        500..=599 => KmsErrorKind::Unavailable,
        404 if has("no handler for route") => KmsErrorKind::KeyNotFound,
        _ if has("encryption key not found") || has("key not found") => KmsErrorKind::KeyNotFound,
        _ if has("soft-deleted") => KmsErrorKind::KeyDisabled,
        _ if has("disallowed by policy") => KmsErrorKind::KeyVersionDisallowed,
        _ if has("message authentication failed")
            || has("invalid ciphertext")
            || has("version is too new")
            || has("for key derivation")
            || has("illegal base64") =>
        {
            KmsErrorKind::InvalidCiphertext
        }
        400..=499 => KmsErrorKind::InvalidRequest,
        _ => KmsErrorKind::Other,
    }
}

fn invalid_response(action: &str, what: &str) -> KmsError {
    KmsError::new(PROVIDER, KmsErrorKind::InvalidResponse).with_message(format!("{action}: {what}"))
}

/// Take a base64 string field out of `data`, wiped on drop (and taken out of the response).
fn take_secret(
    data: &mut Value,
    action: &str,
    name: &str,
) -> std::result::Result<Zeroizing<String>, KmsError> {
    match data.get_mut(name).map(Value::take) {
        Some(Value::String(s)) => Ok(Zeroizing::new(s)),
        _ => Err(invalid_response(action, &format!("response has no {name}"))),
    }
}

fn key_from_base64(action: &str, b64: &str) -> std::result::Result<KeyMaterial, KmsError> {
    let bytes = Zeroizing::new(
        STANDARD
            .decode(b64)
            .map_err(|_| invalid_response(action, "plaintext is not base64"))?,
    );
    KeyMaterial::from_slice(&bytes)
        .map_err(|_| invalid_response(action, "plaintext is not a 32-byte key"))
}

fn ciphertext(data: &Value, action: &str) -> std::result::Result<Vec<u8>, KmsError> {
    match data.get("ciphertext").and_then(Value::as_str) {
        Some(c) if c.starts_with("vault:v") => Ok(c.as_bytes().to_vec()),
        _ => Err(invalid_response(
            action,
            "response has no vault:vN: ciphertext",
        )),
    }
}

fn ciphertext_str(wrapped: &[u8]) -> std::result::Result<&str, KmsError> {
    std::str::from_utf8(wrapped)
        .ok()
        .filter(|c| c.starts_with("vault:v"))
        .ok_or_else(|| {
            KmsError::new(PROVIDER, KmsErrorKind::InvalidCiphertext).with_message(
                "a transit ciphertext is text starting with vault:v; these bytes are not",
            )
        })
}

#[async_trait]
impl KmsProvider for VaultKms {
    fn name(&self) -> &str {
        PROVIDER
    }

    fn call_budget(&self) -> Option<Duration> {
        Some(self.retry.budget())
    }

    async fn generate_data_key(
        &self,
        cmk: &str,
        context: &EncryptionContext,
    ) -> std::result::Result<GeneratedDataKey, KmsError> {
        let path = KeyPath::parse(cmk)?;
        let ctx = context_b64(context);
        let action = "datakey";
        let mut data = self
            .call(
                action,
                self.url(path.mount, &["datakey", "plaintext"], path.key),
                json!({"bits": 256, "context": ctx, "associated_data": ctx}),
            )
            .await?;
        let b64 = take_secret(&mut data, action, "plaintext")?;
        let plaintext = key_from_base64(action, &b64)?;
        let wrapped = ciphertext(&data, action)?;
        Ok(GeneratedDataKey { plaintext, wrapped })
    }

    async fn decrypt(
        &self,
        cmk: &str,
        wrapped: &[u8],
        context: &EncryptionContext,
    ) -> std::result::Result<KeyMaterial, KmsError> {
        // The path names the transit key: a key wrapped under any other one fails to open.
        let path = KeyPath::parse(cmk)?;
        let ctx = context_b64(context);
        let action = "decrypt";
        let mut data = self
            .call(
                action,
                self.url(path.mount, &["decrypt"], path.key),
                json!({"ciphertext": ciphertext_str(wrapped)?, "context": ctx, "associated_data": ctx}),
            )
            .await?;
        let b64 = take_secret(&mut data, action, "plaintext")?;
        key_from_base64(action, &b64)
    }

    async fn encrypt(
        &self,
        cmk: &str,
        plaintext: &KeyMaterial,
        context: &EncryptionContext,
    ) -> std::result::Result<Vec<u8>, KmsError> {
        let path = KeyPath::parse(cmk)?;
        let ctx = context_b64(context);
        let b64 = Zeroizing::new(STANDARD.encode(plaintext.expose()));
        let action = "encrypt";
        let data = self
            .call(
                action,
                self.url(path.mount, &["encrypt"], path.key),
                json!({"plaintext": b64.as_str(), "context": ctx, "associated_data": ctx}),
            )
            .await?;
        ciphertext(&data, action)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kms() -> VaultKms {
        VaultKms::new(VaultConfig::new(
            "http://127.0.0.1:8200",
            SecretString::new("s.secret-token"),
        ))
        .unwrap()
    }

    #[test]
    fn key_paths_are_mount_and_key_segments() {
        let k = kms();
        let p = KeyPath::parse("transit/users").unwrap();
        assert_eq!((p.mount, p.key), ("transit", "users"));
        let p = KeyPath::parse("team-a/transit/users.v2").unwrap();
        assert_eq!((p.mount, p.key), ("team-a/transit", "users.v2"));
        assert_eq!(
            k.url(p.mount, &["datakey", "plaintext"], p.key).as_str(),
            "http://127.0.0.1:8200/v1/team-a/transit/datakey/plaintext/users.v2"
        );
        for bad in [
            "users",
            "transit/",
            "/users",
            "transit/../sys",
            "transit/a b",
            "transit//users",
            "transit/us%2Fers",
            "transit/..",
        ] {
            let e = KeyPath::parse(bad).err().unwrap();
            assert_eq!(e.kind(), KmsErrorKind::InvalidRequest, "{bad}");
            assert!(e.to_string().contains("MOUNT/KEY"), "{e}");
        }
        // A base path (a proxy prefix) is kept.
        let k = VaultKms::new(VaultConfig::new(
            "http://localhost:8200/vault/",
            SecretString::new("t"),
        ))
        .unwrap();
        assert_eq!(
            k.url("transit", &["decrypt"], "k").as_str(),
            "http://localhost:8200/vault/v1/transit/decrypt/k"
        );
    }

    #[test]
    fn errors_are_classified() {
        use KmsErrorKind as K;
        for (status, message, kind) in [
            (403, "permission denied", K::Auth),
            (400, "encryption key not found", K::KeyNotFound),
            (
                404,
                "no handler for route \"nomount/decrypt/k\". route entry not found.",
                K::KeyNotFound,
            ),
            (400, "refusing to use soft-deleted key", K::KeyDisabled),
            (
                400,
                "ciphertext or signature version is disallowed by policy (too old)",
                K::KeyVersionDisallowed,
            ),
            (
                400,
                "cipher: message authentication failed",
                K::InvalidCiphertext,
            ),
            (400, "invalid ciphertext: no prefix", K::InvalidCiphertext),
            (400, "invalid ciphertext length", K::InvalidCiphertext),
            (
                400,
                "invalid ciphertext: version is too new",
                K::InvalidCiphertext,
            ),
            (
                400,
                "missing 'context' for key derivation; the key was created using a derived key",
                K::InvalidCiphertext,
            ),
            (400, "bits must be 128, 256, or 512", K::InvalidRequest),
            (
                429,
                "request path \"transit/decrypt/k\": rate limit quota exceeded",
                K::Throttled,
            ),
            (503, "Vault is sealed", K::Unavailable),
            (500, "internal error", K::Unavailable),
        ] {
            assert_eq!(classify(status, message), kind, "{status} {message}");
        }
        assert!(classify(503, "Vault is sealed").is_retryable());
        assert!(!classify(403, "permission denied").is_retryable());
        assert!(!classify(400, "disallowed by policy").is_retryable());
    }

    #[test]
    fn debug_hides_the_token() {
        let k = kms();
        let dbg = format!("{k:?}");
        assert!(
            dbg.contains("127.0.0.1:8200") && !dbg.contains("s.secret-token"),
            "{dbg}"
        );
    }

    #[test]
    fn bad_configurations_are_refused() {
        let t = || SecretString::new("t");
        for (address, needle) in [
            ("http://10.1.2.3:8200", "not a loopback address"),
            ("vault.example.com:8200", "http(s) URL"),
            ("https://vault.example.com/?x=1", "query"),
        ] {
            let e = VaultKms::new(VaultConfig::new(address, t())).unwrap_err();
            assert!(e.to_string().contains(needle), "{address}: {e}");
        }
        let e = VaultKms::new(VaultConfig::new("https://v", SecretString::new(""))).unwrap_err();
        assert!(e.to_string().contains("token"), "{e}");
        let mut c = VaultConfig::new("https://v", t());
        c.ca_certificate_pem = Some(b"not pem".to_vec());
        let e = VaultKms::new(c).unwrap_err();
        assert!(e.to_string().contains("CA certificate"), "{e}");
        assert_eq!(
            kms().call_budget(),
            Some(Duration::from_millis(7950)),
            "the defaults fit the keyring's default kms_timeout"
        );
    }

    #[test]
    fn wrapped_keys_must_look_like_transit_ciphertexts() {
        assert!(ciphertext_str(b"vault:v1:abc").is_ok());
        for bad in [&b"\xff\xfe"[..], b"abc", b""] {
            assert_eq!(
                ciphertext_str(bad).unwrap_err().kind(),
                KmsErrorKind::InvalidCiphertext
            );
        }
    }
}
