//! Tencent Cloud KMS (API 3.0, version `2019-01-18`), signed with TC3-HMAC-SHA256.
//!
//! ```no_run
//! # async fn demo() -> Result<(), envelope_core::Error> {
//! use std::sync::Arc;
//! use envelope_core::kms::tencent::{TencentConfig, TencentKms};
//! use envelope_core::{Keyring, MemoryKeyStore};
//!
//! // TENCENTCLOUD_SECRET_ID, TENCENTCLOUD_SECRET_KEY, TENCENTCLOUD_REGION
//! // (and TENCENTCLOUD_SESSION_TOKEN for temporary credentials).
//! let kms = TencentKms::new(TencentConfig::from_env()?)?;
//! let keyring = Keyring::builder(kms, MemoryKeyStore::new()).cmk("<your CMK id>")
//!     .build()?;
//! # Ok(()) }
//! ```
//!
//! Requests go over HTTPS (rustls; no OpenSSL) to `kms.tencentcloudapi.com` unless
//! [`TencentConfig::endpoint`] points elsewhere (a private endpoint, or the `envelope
//! kms-emulator`). Plain `http://` is accepted only for a loopback host (the emulator), unless
//! [`TencentConfig::danger_allow_insecure_http`] is set; redirects are never followed. Errors
//! that Tencent reports in `Response.Error` become typed [`KmsError`]s carrying the code and
//! RequestId. Network errors, HTTP 5xx, `InternalError` and the `RequestLimitExceeded` family are
//! retried with jittered exponential back-off, signing each attempt anew; authentication and
//! ciphertext errors never are. No request or response body is ever logged: a GenerateDataKey
//! response holds a plaintext key.
//!
//! # Which CMK unwrapped the key
//!
//! A Tencent `CiphertextBlob` names its own CMK, and Decrypt takes no KeyId: the service unwraps
//! under whichever CMK the blob names, if these credentials may use it. So the provider checks
//! the `KeyId` that every response names against the CMK the caller asked for (the key record's
//! CMK) and refuses the result, with a [`KmsErrorKind::InvalidCiphertext`] error naming both ids,
//! when they differ and the response's CMK is not in [`TencentConfig::also_accept_cmks`].
//! Without this check, whoever can write the key table could substitute a data key wrapped under
//! any other CMK the credentials can use, and forge values under it. The record's CMK itself is
//! checked by the keyring, before the call, against the CMKs it is configured with
//! ([`KeyringBuilder::trust_cmk`](crate::KeyringBuilder::trust_cmk)): a record that names
//! another CMK, and holds a key wrapped under it, never reaches the KMS.
//!
//! Tencent names keys by their KeyId (UUID-like) in responses, never by alias. A CMK configured
//! as `alias/NAME` therefore never matches by itself: list its KeyId in
//! [`TencentConfig::also_accept_cmks`], or (better) configure the keyring with the KeyId. The
//! provider does not resolve aliases with DescribeKey: that would be a second call inside the
//! keyring's deadline, and an alias can be moved to another key. Key records name the CMK as the
//! keyring was given it: a keyring moved from `alias/NAME` to the KeyId keeps reading the older
//! records only with `trust_cmk("alias/NAME")` and the KeyId in `also_accept_cmks`.

mod credentials;
pub(crate) mod sign;

pub use credentials::InstanceRole;
use credentials::{Credentials, RoleSource, Source};

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use serde::Deserialize;
use serde_json::{Value, json};
use zeroize::Zeroizing;

use crate::error::{Error, KmsError, KmsErrorKind, Result};
use crate::keys::KeyMaterial;
use crate::kms::http::{self, Retry};
use crate::kms::{EncryptionContext, GeneratedDataKey, KmsProvider};
use crate::secret::SecretString;

const PROVIDER: &str = "tencent";
/// The API version these actions belong to.
pub const API_VERSION: &str = "2019-01-18";
const SERVICE: &str = "kms";
const DEFAULT_ENDPOINT: &str = "https://kms.tencentcloudapi.com";

/// How to reach and authenticate to Tencent Cloud KMS.
#[derive(Clone)]
pub struct TencentConfig {
    /// The SecretId.
    pub secret_id: String,
    /// The SecretKey.
    pub secret_key: SecretString,
    /// An STS session token, sent as `X-TC-Token`, for temporary credentials.
    pub session_token: Option<SecretString>,
    /// Take the credentials of the instance's CAM role from the metadata service instead of
    /// `secret_id`/`secret_key` (which are then ignored). See [`InstanceRole`].
    pub instance_role: Option<InstanceRole>,
    /// The region, for example `ap-guangzhou`.
    pub region: String,
    /// Base URL; default `https://kms.tencentcloudapi.com`. Plain `http://` is accepted only
    /// when the host is a loopback address (`127.0.0.0/8`, `::1`, `localhost`: the local
    /// emulator), unless [`TencentConfig::danger_allow_insecure_http`] is set.
    pub endpoint: String,
    /// Accept `http://` for a host that is not a loopback address. Default `false`.
    ///
    /// KMS responses carry plaintext data keys and requests carry the signed credentials'
    /// session token: over plain HTTP anyone on the path reads every data key. Set it only for a
    /// test network you control.
    pub danger_allow_insecure_http: bool,
    /// CMK ids (KeyIds) accepted as the key that unwrapped a data key, besides the CMK the key
    /// record names. Default empty.
    ///
    /// Decrypt's response names the CMK that unwrapped the key; a result from any CMK other than
    /// the record's one or these is refused (a key record edited to hold a key wrapped under
    /// another CMK). List here the KeyId behind an `alias/NAME` CMK: Tencent's responses name
    /// KeyIds, never aliases, so a key made through an alias never matches by itself.
    ///
    /// This list only says which KeyId may answer for a record's CMK; it does not make the
    /// keyring trust a record that *names* one of these CMKs. Which CMKs a record may name is the
    /// keyring's list ([`KeyringBuilder::cmk`](crate::KeyringBuilder::cmk),
    /// [`KeyringBuilder::trust_cmk`](crate::KeyringBuilder::trust_cmk)), checked before any call.
    /// A KeyId listed here answers for every record the keyring trusts: list only CMKs this
    /// application trusts.
    pub also_accept_cmks: Vec<String>,
    /// How long one call may wait and how often it is tried ([`crate::kms::CallLimits`]).
    pub limits: crate::kms::CallLimits,
}

impl fmt::Debug for TencentConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TencentConfig")
            .field("secret_id", &self.secret_id)
            .field("secret_key", &self.secret_key)
            .field("session_token", &self.session_token)
            .field("instance_role", &self.instance_role)
            .field("region", &self.region)
            .field("endpoint", &self.endpoint)
            .field(
                "danger_allow_insecure_http",
                &self.danger_allow_insecure_http,
            )
            .field("also_accept_cmks", &self.also_accept_cmks)
            .field("limits", &self.limits)
            .finish()
    }
}

impl TencentConfig {
    /// A configuration with the given credentials and region and default settings.
    pub fn new(
        secret_id: impl Into<String>,
        secret_key: impl Into<SecretString>,
        region: impl Into<String>,
    ) -> Self {
        TencentConfig {
            secret_id: secret_id.into(),
            secret_key: secret_key.into(),
            session_token: None,
            instance_role: None,
            region: region.into(),
            endpoint: DEFAULT_ENDPOINT.to_owned(),
            danger_allow_insecure_http: false,
            also_accept_cmks: Vec::new(),
            limits: crate::kms::CallLimits::default(),
        }
    }

    /// Read `TENCENTCLOUD_SECRET_ID`, `TENCENTCLOUD_SECRET_KEY`, `TENCENTCLOUD_REGION` and, if
    /// set, `TENCENTCLOUD_SESSION_TOKEN` and `ENVELOPE_TENCENT_ENDPOINT`.
    ///
    /// # Errors
    /// [`Error::Config`] naming the missing variable.
    pub fn from_env() -> Result<Self> {
        let region = std::env::var("TENCENTCLOUD_REGION").map_err(|_| {
            Error::config(
                "TENCENTCLOUD_REGION",
                "is not set (Tencent Cloud KMS needs TENCENTCLOUD_SECRET_ID, TENCENTCLOUD_SECRET_KEY and TENCENTCLOUD_REGION)",
            )
        })?;
        Self::for_region_from_env(region)
    }

    /// A configuration for `region` that signs with the CVM instance's CAM role credentials
    /// (see [`InstanceRole`]), with default settings.
    pub fn with_instance_role(region: impl Into<String>, role: InstanceRole) -> Self {
        TencentConfig {
            instance_role: Some(role),
            ..TencentConfig::new(String::new(), SecretString::new(""), region)
        }
    }

    /// A configuration for `region` whose credentials come from the environment:
    /// `TENCENTCLOUD_SECRET_ID`, `TENCENTCLOUD_SECRET_KEY` and, if set,
    /// `TENCENTCLOUD_SESSION_TOKEN`; or, with `ENVELOPE_TENCENT_CREDENTIALS=instance-role`, the
    /// instance's CAM role (`ENVELOPE_TENCENT_ROLE` names it, else the metadata service does;
    /// `ENVELOPE_TENCENT_METADATA_ENDPOINT` points at another metadata service). The endpoint
    /// comes from `ENVELOPE_TENCENT_ENDPOINT` if set.
    ///
    /// # Errors
    /// [`Error::Config`] naming the missing variable.
    pub fn for_region_from_env(region: impl Into<String>) -> Result<Self> {
        let env = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        let endpoint = env("ENVELOPE_TENCENT_ENDPOINT");
        match env("ENVELOPE_TENCENT_CREDENTIALS").as_deref() {
            None | Some("environment") => {}
            Some("instance-role") => {
                let mut role = InstanceRole {
                    role: env("ENVELOPE_TENCENT_ROLE"),
                    ..InstanceRole::default()
                };
                if let Some(m) = env("ENVELOPE_TENCENT_METADATA_ENDPOINT") {
                    role.metadata_endpoint = m;
                }
                let mut config = TencentConfig::with_instance_role(region, role);
                if let Some(endpoint) = endpoint {
                    config.endpoint = endpoint;
                }
                return Ok(config);
            }
            Some(other) => {
                return Err(Error::config(
                    format!("ENVELOPE_TENCENT_CREDENTIALS={other:?}"),
                    "expected `environment` (TENCENTCLOUD_SECRET_ID/KEY) or `instance-role` (the CVM instance's CAM role)",
                ));
            }
        }
        let var = |name: &'static str| {
            std::env::var(name).ok().filter(|v| !v.is_empty()).ok_or_else(|| {
                Error::config(
                    name,
                    "is not set (Tencent Cloud KMS needs TENCENTCLOUD_SECRET_ID and TENCENTCLOUD_SECRET_KEY in the environment, or ENVELOPE_TENCENT_CREDENTIALS=instance-role on a CVM instance with a CAM role; credentials are never read from a config file)",
                )
            })
        };
        let mut config = TencentConfig::new(
            var("TENCENTCLOUD_SECRET_ID")?,
            SecretString::new(var("TENCENTCLOUD_SECRET_KEY")?),
            region,
        );
        config.session_token = std::env::var("TENCENTCLOUD_SESSION_TOKEN")
            .ok()
            .filter(|t| !t.is_empty())
            .map(SecretString::new);
        if let Some(endpoint) = endpoint {
            config.endpoint = endpoint;
        }
        Ok(config)
    }

    /// Point at another endpoint (a private endpoint, or the emulator).
    pub fn with_endpoint(mut self, endpoint: impl Into<String>) -> Self {
        self.endpoint = endpoint.into();
        self
    }
}

/// A Tencent Cloud KMS client. Cheap to share; reuses connections.
pub struct TencentKms {
    config: TencentConfig,
    credentials: Source,
    retry: Retry,
    url: reqwest::Url,
    host: String,
    client: reqwest::Client,
}

impl fmt::Debug for TencentKms {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TencentKms")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// Key metadata as DescribeKey and CreateKey return it (the fields envelope uses).
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "PascalCase")]
#[non_exhaustive]
pub struct KeyMetadata {
    /// The CMK id.
    pub key_id: String,
    /// `Enabled`, `Disabled`, `PendingDelete`, ...
    pub key_state: String,
    /// The alias, if any.
    #[serde(default)]
    pub alias: String,
}

impl TencentKms {
    /// A client for `config`.
    ///
    /// # Errors
    /// [`Error::Config`] for an unusable endpoint or settings, and for a plain `http://` endpoint
    /// whose host is not a loopback address (unless
    /// [`TencentConfig::danger_allow_insecure_http`] is set).
    pub fn new(config: TencentConfig) -> Result<Self> {
        let credentials = match &config.instance_role {
            Some(role) => Source::Role(RoleSource::new(role, config.danger_allow_insecure_http)?),
            None if config.secret_id.is_empty() || config.secret_key.is_empty() => {
                return Err(Error::config(
                    "TencentConfig::secret_id / secret_key",
                    "must not be empty (or set TencentConfig::instance_role)",
                ));
            }
            None => Source::Fixed(Arc::new(Credentials::fixed(
                config.secret_id.clone(),
                config.secret_key.clone(),
                config.session_token.clone(),
            ))),
        };
        if config.region.is_empty() {
            return Err(Error::config("TencentConfig::region", "must not be empty"));
        }
        let url = http::endpoint(
            "Tencent",
            "TencentConfig::danger_allow_insecure_http",
            &config.endpoint,
            config.danger_allow_insecure_http,
        )?;
        // The Host header hyper sends: the host, plus the port when it is not the scheme's.
        let host = match (url.host_str(), url.port()) {
            (Some(h), Some(p)) => format!("{h}:{p}"),
            (Some(h), None) => h.to_owned(),
            (None, _) => unreachable!("checked above"),
        };
        // A 3xx is an error (see `attempt`).
        let client = http::client(
            config.limits.connect_timeout,
            config.limits.request_timeout,
            Vec::new(),
        )?;
        Ok(TencentKms {
            host,
            url,
            client,
            credentials,
            retry: Retry::new(
                config.limits.request_timeout,
                config.limits.max_attempts,
                config.limits.backoff,
            ),
            config,
        })
    }

    /// Call `action` with `params`, retrying what may succeed on a second try.
    async fn call(&self, action: &str, params: Value) -> std::result::Result<Value, KmsError> {
        // Serialized once: every attempt signs and sends these exact bytes.
        let body = Zeroizing::new(serde_json::to_vec(&params).map_err(|e| {
            KmsError::new(PROVIDER, KmsErrorKind::InvalidRequest).with_message(e.to_string())
        })?);
        drop(params);
        let credentials = match &self.credentials {
            Source::Fixed(c) => c.clone(),
            Source::Role(role) => role.get(&self.client).await?,
        };
        let result = self
            .retry
            .run(PROVIDER, action, || {
                self.attempt(action, &body, &credentials)
            })
            .await;
        if let (Source::Role(role), Err(e)) = (&self.credentials, &result)
            && e.kind() == KmsErrorKind::Auth
        {
            // Revoked or expired early: the next call fetches a new set.
            role.forget().await;
        }
        result
    }

    /// Refuse a result unless `reported` (the KeyId a response names) is `requested` (the CMK
    /// that `named_by` named) or one of [`TencentConfig::also_accept_cmks`].
    fn check_cmk(
        &self,
        action: &str,
        named_by: &str,
        requested: &str,
        reported: &str,
    ) -> std::result::Result<(), KmsError> {
        let same = |a: &str| a.eq_ignore_ascii_case(reported);
        if same(requested) || self.config.also_accept_cmks.iter().any(|a| same(a)) {
            return Ok(());
        }
        Err(
            KmsError::new(PROVIDER, KmsErrorKind::InvalidCiphertext).with_message(format!(
                "{action}: the KMS used CMK {reported}, but {named_by} names CMK {requested}; refused (list {reported} in TencentConfig::also_accept_cmks if keys under it are trusted here)"
            )),
        )
    }

    async fn attempt(
        &self,
        action: &str,
        body: &[u8],
        credentials: &Credentials,
    ) -> std::result::Result<Value, KmsError> {
        let timestamp = i64::try_from(
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs(),
        )
        .unwrap_or(i64::MAX);
        let content_type = "application/json";
        let headers = [("content-type", content_type), ("host", self.host.as_str())];
        let input = sign::CanonicalInput {
            method: "POST",
            uri: "/",
            query: "",
            headers: &headers,
            payload: body,
        };
        let authorization = sign::authorization(
            &credentials.secret_id,
            credentials.secret_key.expose().as_bytes(),
            timestamp,
            SERVICE,
            &input,
        );
        let mut request = self
            .client
            .post(self.url.clone())
            .header("Content-Type", content_type)
            .header("Authorization", authorization)
            .header("X-TC-Action", action)
            .header("X-TC-Version", API_VERSION)
            .header("X-TC-Region", &self.config.region)
            .header("X-TC-Timestamp", timestamp.to_string())
            .header("X-TC-Language", "en-US")
            .body(body.to_vec());
        if let Some(token) = &credentials.token {
            request = request.header("X-TC-Token", token.expose());
        }
        let response = request
            .send()
            .await
            .map_err(|e| http::transport_error(PROVIDER, &e))?;
        let status = response.status();
        let bytes = http::read_capped(PROVIDER, response).await?;
        if status.is_server_error() {
            return Err(KmsError::new(PROVIDER, KmsErrorKind::Unavailable)
                .with_message(format!("HTTP {status}")));
        }
        if status.is_redirection() {
            return Err(
                KmsError::new(PROVIDER, KmsErrorKind::InvalidResponse).with_message(format!(
                    "HTTP {status}: the endpoint answered with a redirect, which is never followed (point TencentConfig::endpoint at the KMS itself)"
                )),
            );
        }
        if status != reqwest::StatusCode::OK {
            return Err(KmsError::new(PROVIDER, KmsErrorKind::InvalidResponse)
                .with_message(format!("HTTP {status}")));
        }
        parse_response(&bytes)
    }

    /// Create a symmetric CMK (`ENCRYPT_DECRYPT`); returns its id.
    ///
    /// # Errors
    /// The KMS's error.
    pub async fn create_key(&self, alias: &str, description: &str) -> Result<KeyMetadata> {
        let r = self
            .call(
                "CreateKey",
                json!({"Alias": alias, "Description": description, "KeyUsage": "ENCRYPT_DECRYPT"}),
            )
            .await?;
        Ok(from_response(r)?)
    }

    /// Describe a CMK.
    ///
    /// # Errors
    /// The KMS's error.
    pub async fn describe_key(&self, key_id: &str) -> Result<KeyMetadata> {
        let r = self.call("DescribeKey", json!({"KeyId": key_id})).await?;
        let meta = r
            .get("KeyMetadata")
            .cloned()
            .ok_or_else(|| invalid_response("DescribeKey without KeyMetadata"))?;
        Ok(from_response(meta)?)
    }

    /// Enable a CMK.
    ///
    /// # Errors
    /// The KMS's error.
    pub async fn enable_key(&self, key_id: &str) -> Result<()> {
        self.call("EnableKey", json!({"KeyId": key_id})).await?;
        Ok(())
    }

    /// Disable a CMK: it can no longer generate or unwrap keys until enabled again.
    ///
    /// # Errors
    /// The KMS's error.
    pub async fn disable_key(&self, key_id: &str) -> Result<()> {
        self.call("DisableKey", json!({"KeyId": key_id})).await?;
        Ok(())
    }

    /// Schedule a CMK's deletion after `pending_days` (7 to 30 on the real service).
    ///
    /// # Errors
    /// The KMS's error.
    pub async fn schedule_key_deletion(&self, key_id: &str, pending_days: u32) -> Result<()> {
        self.call(
            "ScheduleKeyDeletion",
            json!({"KeyId": key_id, "PendingWindowInDays": pending_days}),
        )
        .await?;
        Ok(())
    }
}

fn invalid_response(what: &str) -> KmsError {
    KmsError::new(PROVIDER, KmsErrorKind::InvalidResponse).with_message(what.to_owned())
}

fn from_response<T: serde::de::DeserializeOwned>(v: Value) -> std::result::Result<T, KmsError> {
    // The error names the missing field, never the body.
    serde_json::from_value(v)
        .map_err(|e| invalid_response(&format!("unexpected response shape: {e}")))
}

/// Map a Tencent error code to the kind of failure it is.
pub(crate) fn classify(code: &str) -> KmsErrorKind {
    let family = |prefix: &str| code == prefix || code.starts_with(&format!("{prefix}."));
    match code {
        "ResourceUnavailable.CmkDisabled" | "ResourceUnavailable.KeyDisabled" => {
            KmsErrorKind::KeyDisabled
        }
        "ResourceUnavailable.KeyPendingDelete" => KmsErrorKind::KeyPendingDeletion,
        "ResourceUnavailable.CmkNotFound"
        | "InvalidParameterValue.InvalidKeyId"
        | "ResourceNotFound" => KmsErrorKind::KeyNotFound,
        "InvalidParameterValue.InvalidCiphertext" | "FailedOperation.DecryptError" => {
            KmsErrorKind::InvalidCiphertext
        }
        "ServiceUnavailable" | "UnsupportedOperation.ServiceTemporaryUnavailable" => {
            KmsErrorKind::Unavailable
        }
        _ if family("InternalError") => KmsErrorKind::Unavailable,
        _ if family("RequestLimitExceeded") => KmsErrorKind::Throttled,
        _ if family("AuthFailure") || family("UnauthorizedOperation") => KmsErrorKind::Auth,
        _ if family("InvalidParameter")
            || family("InvalidParameterValue")
            || family("MissingParameter")
            || family("UnknownParameter")
            || family("InvalidAction")
            || family("RequestSizeLimitExceeded") =>
        {
            KmsErrorKind::InvalidRequest
        }
        _ => KmsErrorKind::Other,
    }
}

/// Read `{"Response": {...}}`, turning `Response.Error` into a typed error first.
fn parse_response(bytes: &[u8]) -> std::result::Result<Value, KmsError> {
    let mut v: Value =
        serde_json::from_slice(bytes).map_err(|_| invalid_response("response is not JSON"))?;
    let mut response = v
        .get_mut("Response")
        .map(Value::take)
        .ok_or_else(|| invalid_response("response has no Response object"))?;
    let request_id = response
        .get("RequestId")
        .and_then(Value::as_str)
        .map(str::to_owned);
    if let Some(error) = response.get("Error") {
        let code = error.get("Code").and_then(Value::as_str).unwrap_or("");
        let message: String = error
            .get("Message")
            .and_then(Value::as_str)
            .unwrap_or("")
            .chars()
            .take(300)
            .collect();
        let mut e = KmsError::new(PROVIDER, classify(code))
            .with_code(code)
            .with_message(message);
        if let Some(id) = request_id {
            e = e.with_request_id(id);
        }
        return Err(e);
    }
    if let Some(obj) = response.as_object_mut() {
        obj.remove("RequestId");
    }
    Ok(response)
}

fn field<'a>(v: &'a Value, name: &str) -> std::result::Result<&'a str, KmsError> {
    v.get(name)
        .and_then(Value::as_str)
        .ok_or_else(|| invalid_response(&format!("response has no {name}")))
}

fn key_from_base64(b64: &str) -> std::result::Result<KeyMaterial, KmsError> {
    let bytes = Zeroizing::new(
        STANDARD
            .decode(b64)
            .map_err(|_| invalid_response("Plaintext is not base64"))?,
    );
    KeyMaterial::from_slice(&bytes).map_err(|_| invalid_response("Plaintext is not a 32-byte key"))
}

fn blob_str(wrapped: &[u8]) -> std::result::Result<&str, KmsError> {
    std::str::from_utf8(wrapped).map_err(|_| {
        KmsError::new(PROVIDER, KmsErrorKind::InvalidCiphertext)
            .with_message("a Tencent CiphertextBlob is ASCII; these bytes are not")
    })
}

/// Take the base64 `Plaintext` out of a response (wiped on drop, and wiped in the response).
fn take_plaintext(r: &mut Value) -> std::result::Result<Zeroizing<String>, KmsError> {
    match r.get_mut("Plaintext").map(Value::take) {
        Some(Value::String(s)) => Ok(Zeroizing::new(s)),
        _ => Err(invalid_response("response has no Plaintext")),
    }
}

#[async_trait]
impl KmsProvider for TencentKms {
    fn name(&self) -> &str {
        PROVIDER
    }

    /// Every attempt at its full `request_timeout` (which includes connecting), plus every
    /// back-off at its longest jitter (150 %).
    fn call_budget(&self) -> Option<Duration> {
        let credentials = match &self.credentials {
            Source::Fixed(_) => Duration::ZERO,
            Source::Role(role) => role.budget(),
        };
        Some(self.retry.budget().saturating_add(credentials))
    }

    async fn generate_data_key(
        &self,
        cmk: &str,
        context: &EncryptionContext,
    ) -> std::result::Result<GeneratedDataKey, KmsError> {
        let mut r = self
            .call(
                "GenerateDataKey",
                json!({"KeyId": cmk, "KeySpec": "AES_256", "EncryptionContext": context.canonical_json()}),
            )
            .await?;
        let b64 = take_plaintext(&mut r)?;
        // A key made under a CMK that a later Decrypt would refuse is refused now, at the first
        // write, rather than on the first cold read (an alias CMK not in `also_accept_cmks`).
        self.check_cmk("GenerateDataKey", "the keyring", cmk, field(&r, "KeyId")?)?;
        let plaintext = key_from_base64(&b64)?;
        let wrapped = field(&r, "CiphertextBlob")?.as_bytes().to_vec();
        Ok(GeneratedDataKey { plaintext, wrapped })
    }

    async fn decrypt(
        &self,
        cmk: &str,
        wrapped: &[u8],
        context: &EncryptionContext,
    ) -> std::result::Result<KeyMaterial, KmsError> {
        // The blob names its CMK; Decrypt takes no KeyId, so the response's KeyId is checked.
        let mut r = self
            .call(
                "Decrypt",
                json!({"CiphertextBlob": blob_str(wrapped)?, "EncryptionContext": context.canonical_json()}),
            )
            .await?;
        let b64 = take_plaintext(&mut r)?;
        self.check_cmk("Decrypt", "the key record", cmk, field(&r, "KeyId")?)?;
        key_from_base64(&b64)
    }

    async fn encrypt(
        &self,
        cmk: &str,
        plaintext: &KeyMaterial,
        context: &EncryptionContext,
    ) -> std::result::Result<Vec<u8>, KmsError> {
        let b64 = Zeroizing::new(STANDARD.encode(plaintext.expose()));
        let r = self
            .call(
                "Encrypt",
                json!({"KeyId": cmk, "Plaintext": b64.as_str(), "EncryptionContext": context.canonical_json()}),
            )
            .await?;
        self.check_cmk("Encrypt", "the keyring", cmk, field(&r, "KeyId")?)?;
        Ok(field(&r, "CiphertextBlob")?.as_bytes().to_vec())
    }

    async fn re_encrypt(
        &self,
        wrapped: &[u8],
        source_cmk: &str,
        source_context: &EncryptionContext,
        destination_cmk: &str,
        destination_context: &EncryptionContext,
    ) -> std::result::Result<Vec<u8>, KmsError> {
        let r = self
            .call(
                "ReEncrypt",
                json!({
                    "CiphertextBlob": blob_str(wrapped)?,
                    "DestinationKeyId": destination_cmk,
                    "SourceEncryptionContext": source_context.canonical_json(),
                    "DestinationEncryptionContext": destination_context.canonical_json(),
                }),
            )
            .await?;
        // Without the source check a substituted key would be laundered: rewrapped under the
        // destination CMK, it would pass every later Decrypt check.
        self.check_cmk(
            "ReEncrypt",
            "the key record",
            source_cmk,
            field(&r, "SourceKeyId")?,
        )?;
        self.check_cmk(
            "ReEncrypt",
            "the destination",
            destination_cmk,
            field(&r, "KeyId")?,
        )?;
        Ok(field(&r, "CiphertextBlob")?.as_bytes().to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_are_classified() {
        assert_eq!(classify("AuthFailure.SignatureFailure"), KmsErrorKind::Auth);
        assert_eq!(classify("RequestLimitExceeded"), KmsErrorKind::Throttled);
        assert_eq!(
            classify("RequestLimitExceeded.UinLimitExceeded"),
            KmsErrorKind::Throttled
        );
        assert_eq!(classify("InternalError"), KmsErrorKind::Unavailable);
        assert_eq!(
            classify("ResourceUnavailable.CmkDisabled"),
            KmsErrorKind::KeyDisabled
        );
        assert_eq!(
            classify("ResourceUnavailable.KeyPendingDelete"),
            KmsErrorKind::KeyPendingDeletion
        );
        assert_eq!(
            classify("InvalidParameterValue.InvalidCiphertext"),
            KmsErrorKind::InvalidCiphertext
        );
        assert_eq!(classify("MissingParameter"), KmsErrorKind::InvalidRequest);
        assert_eq!(classify("Whatever.Else"), KmsErrorKind::Other);
        assert!(!classify("AuthFailure.SignatureExpire").is_retryable());
        assert!(!classify("FailedOperation.DecryptError").is_retryable());
        assert!(classify("RequestLimitExceeded.IPLimitExceeded").is_retryable());
    }

    #[test]
    fn response_error_is_parsed_first() {
        let body = br#"{"Response":{"Error":{"Code":"ResourceUnavailable.CmkDisabled","Message":"disabled"},"RequestId":"r-1","Plaintext":"x"}}"#;
        let e = parse_response(body).unwrap_err();
        assert_eq!(e.kind(), KmsErrorKind::KeyDisabled);
        assert_eq!(e.code(), Some("ResourceUnavailable.CmkDisabled"));
        assert_eq!(e.request_id(), Some("r-1"));
        let ok = parse_response(br#"{"Response":{"KeyId":"k","RequestId":"r-2"}}"#).unwrap();
        assert_eq!(ok, json!({"KeyId": "k"}));
        assert_eq!(
            parse_response(b"<html>").unwrap_err().kind(),
            KmsErrorKind::InvalidResponse
        );
    }

    #[test]
    fn config_debug_hides_the_secret_key() {
        let mut c = TencentConfig::new(
            "AKIDxyz",
            SecretString::new("very-secret-key"),
            "ap-guangzhou",
        );
        c.session_token = Some(SecretString::new("token-secret"));
        let dbg = format!("{c:?}");
        assert!(dbg.contains("AKIDxyz"));
        assert!(
            !dbg.contains("very-secret-key") && !dbg.contains("token-secret"),
            "{dbg}"
        );
        let kms = TencentKms::new(c).unwrap();
        assert!(!format!("{kms:?}").contains("very-secret-key"));
    }

    fn config() -> TencentConfig {
        TencentConfig::new("id", SecretString::new("k"), "ap-guangzhou")
    }

    #[test]
    fn plain_http_is_for_loopback_hosts_only() {
        assert!(TencentKms::new(config().with_endpoint("http://127.0.0.1:9190")).is_ok());
        let bad = "http://10.0.0.1:1";
        let err = TencentKms::new(config().with_endpoint(bad)).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, Error::Config(_)), "{msg}");
        assert!(
            msg.contains(bad)
                && msg.contains("not a loopback address")
                && msg.contains("TencentConfig::danger_allow_insecure_http"),
            "{msg}"
        );
        let mut opted_in = config().with_endpoint(bad);
        opted_in.danger_allow_insecure_http = true;
        assert!(TencentKms::new(opted_in).is_ok());
    }

    #[test]
    fn call_budget_fits_the_default_kms_timeout() {
        let defaults = TencentKms::new(config()).unwrap();
        // 3 attempts x 2.5 s, plus back-offs of 100 ms and 200 ms at 150 % jitter.
        assert_eq!(defaults.call_budget(), Some(Duration::from_millis(7950)));
        assert!(defaults.call_budget().unwrap() < crate::Policy::default().kms_timeout);
        let mut c = config();
        c.limits.max_attempts = 0; // clamped to one attempt, no back-off
        c.limits.request_timeout = Duration::from_secs(4);
        assert_eq!(
            TencentKms::new(c).unwrap().call_budget(),
            Some(Duration::from_secs(4))
        );
    }

    #[test]
    fn a_result_from_another_cmk_is_refused_unless_listed() {
        let mut c = config();
        c.also_accept_cmks = vec!["cmk-old".into()];
        let kms = TencentKms::new(c).unwrap();
        kms.check_cmk("Decrypt", "the key record", "cmk-a", "cmk-a")
            .unwrap();
        kms.check_cmk("Decrypt", "the key record", "CMK-A", "cmk-a")
            .unwrap();
        kms.check_cmk("Decrypt", "the key record", "cmk-a", "cmk-old")
            .unwrap();
        let err = kms
            .check_cmk("Decrypt", "the key record", "cmk-a", "cmk-b")
            .unwrap_err();
        assert_eq!(err.kind(), KmsErrorKind::InvalidCiphertext);
        assert!(!err.is_retryable());
        let msg = err.to_string();
        assert!(
            msg.contains("cmk-a") && msg.contains("cmk-b") && msg.contains("the key record"),
            "{msg}"
        );
        // An alias never matches the KeyId Tencent reports by itself.
        let err = kms
            .check_cmk(
                "Decrypt",
                "the key record",
                "alias/users",
                "23e80852-1e38-11e9-b129-5cb9019b4b01",
            )
            .unwrap_err();
        assert_eq!(err.kind(), KmsErrorKind::InvalidCiphertext);
    }

    #[test]
    fn host_header_matches_the_endpoint() {
        let c = TencentConfig::new("id", SecretString::new("k"), "ap-guangzhou");
        assert_eq!(
            TencentKms::new(c.clone()).unwrap().host,
            "kms.tencentcloudapi.com"
        );
        let local = TencentKms::new(c.clone().with_endpoint("http://127.0.0.1:9123")).unwrap();
        assert_eq!(local.host, "127.0.0.1:9123");
        assert!(TencentKms::new(c.with_endpoint("ftp://x")).is_err());
    }
}
