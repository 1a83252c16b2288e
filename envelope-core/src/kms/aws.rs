//! AWS KMS, through the official `aws-sdk-kms` client.
//!
//! ```no_run
//! # async fn demo() -> Result<(), envelope_core::Error> {
//! use envelope_core::kms::aws::{AwsConfig, AwsKms};
//! use envelope_core::{Keyring, MemoryKeyStore};
//!
//! // Credentials from the standard chain: environment, profile, web identity, instance metadata.
//! let kms = AwsKms::new(AwsConfig::new("eu-west-1")).await?;
//! let keyring = Keyring::builder(kms, MemoryKeyStore::new())
//!     .cmk("arn:aws:kms:eu-west-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab")
//!     .build()?;
//! # Ok(()) }
//! ```
//!
//! Credentials come from `aws-config`'s default chain (the `AWS_*` environment variables, the
//! shared config and credentials files with `AWS_PROFILE`, web identity tokens as on EKS, ECS
//! task roles, and EC2 instance metadata), refreshed by the SDK before they expire, unless
//! [`AwsConfig::credentials`] gives static keys. The SDK signs every request (SigV4) and
//! retries throttling, transient 5xx and connection errors with its standard strategy, inside
//! the bound [`KmsProvider::call_budget`] reports.
//!
//! # Which key unwrapped the data key
//!
//! Decrypt and ReEncrypt send the key record's master key as `KeyId` (so AWS refuses a
//! ciphertext made under another key, with `IncorrectKeyException`), and the key ARN every
//! response names is checked against it again: a key id must match the ARN's `key/ID`, an ARN
//! must be equal. An alias (`alias/NAME`) names a key only on the server's side, so for an alias
//! the server's check is the only one.
//!
//! The encryption context is sent as the map itself, so AWS CloudTrail logs show the key id,
//! kind and scope of each data key.

use std::collections::HashMap;
use std::fmt;
use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_kms::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_kms::operation::RequestId as _;
use aws_sdk_kms::primitives::Blob;
use zeroize::Zeroizing;

use crate::error::{Error, KmsError, KmsErrorKind, Result};
use crate::keys::KeyMaterial;
use crate::kms::{EncryptionContext, GeneratedDataKey, KmsProvider, is_loopback_host};
use crate::secret::SecretString;

const PROVIDER: &str = "aws";

/// Static AWS credentials (an access key, and a session token for temporary ones).
#[derive(Clone)]
pub struct AwsStaticCredentials {
    /// The access key id.
    pub access_key_id: String,
    /// The secret access key.
    pub secret_access_key: SecretString,
    /// The session token of temporary credentials.
    pub session_token: Option<SecretString>,
}

impl fmt::Debug for AwsStaticCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AwsStaticCredentials")
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &self.secret_access_key)
            .field("session_token", &self.session_token)
            .finish()
    }
}

/// How to reach and authenticate to AWS KMS.
#[derive(Clone, Debug)]
pub struct AwsConfig {
    /// The region, for example `eu-west-1`.
    pub region: String,
    /// Another endpoint (a VPC endpoint, FIPS endpoint, or a local server such as moto). When
    /// unset, `AWS_ENDPOINT_URL_KMS` or `AWS_ENDPOINT_URL` is used if set, else the region's
    /// public endpoint. Plain `http://` is accepted only for a loopback host unless
    /// [`AwsConfig::danger_allow_insecure_http`] is set.
    pub endpoint: Option<String>,
    /// Static credentials; `None` (the default) uses the SDK's default credential chain.
    pub credentials: Option<AwsStaticCredentials>,
    /// Accept `http://` for a host that is not a loopback address. Default `false`.
    pub danger_allow_insecure_http: bool,
    /// How long one call may wait and how often it is tried ([`crate::kms::CallLimits`]).
    pub limits: crate::kms::CallLimits,
}

impl AwsConfig {
    /// A configuration for `region` with the default credential chain and settings.
    pub fn new(region: impl Into<String>) -> Self {
        AwsConfig {
            region: region.into(),
            endpoint: None,
            credentials: None,
            danger_allow_insecure_http: false,
            limits: crate::kms::CallLimits::default(),
        }
    }

    /// Point at another endpoint.
    pub fn with_endpoint(mut self, endpoint: impl Into<String>) -> Self {
        self.endpoint = Some(endpoint.into());
        self
    }

    /// Use these static credentials instead of the default chain.
    pub fn with_static_credentials(
        mut self,
        access_key_id: impl Into<String>,
        secret_access_key: impl Into<SecretString>,
        session_token: Option<SecretString>,
    ) -> Self {
        self.credentials = Some(AwsStaticCredentials {
            access_key_id: access_key_id.into(),
            secret_access_key: secret_access_key.into(),
            session_token,
        });
        self
    }

    /// The longest one call may take: every attempt at its full timeout plus the longest
    /// back-offs (the SDK's back-off is at most the doubled base, with full jitter).
    fn budget(&self) -> Duration {
        let attempts = self.limits.max_attempts.max(1);
        let mut total = self.limits.request_timeout.saturating_mul(attempts);
        let mut wait = self.limits.backoff;
        for _ in 1..attempts {
            total = total.saturating_add(wait.min(MAX_BACKOFF));
            wait = wait.saturating_mul(2);
        }
        total
    }
}

/// The SDK's back-off never grows past this.
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// An AWS KMS client. Cheap to share; reuses connections.
pub struct AwsKms {
    client: aws_sdk_kms::Client,
    config: AwsConfig,
    budget: Duration,
}

impl fmt::Debug for AwsKms {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AwsKms")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl AwsKms {
    /// A client for `config`. Reads the shared AWS configuration (profile files, environment)
    /// but makes no call: credentials are resolved at the first request.
    ///
    /// # Errors
    /// [`Error::Config`] for an empty region or an endpoint that is not an http(s) URL, or is
    /// plain http to a host that is not a loopback address.
    pub async fn new(config: AwsConfig) -> Result<Self> {
        use aws_config::retry::RetryConfig;
        use aws_config::timeout::TimeoutConfig;

        if config.region.is_empty() {
            return Err(Error::config("AwsConfig::region", "must not be empty"));
        }
        let endpoint = config.endpoint.clone().or_else(|| {
            ["AWS_ENDPOINT_URL_KMS", "AWS_ENDPOINT_URL"]
                .iter()
                .find_map(|v| std::env::var(v).ok().filter(|e| !e.is_empty()))
        });
        if let Some(e) = &endpoint {
            check_endpoint(e, config.danger_allow_insecure_http)?;
        }
        let budget = config.budget();
        let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .region(aws_config::Region::new(config.region.clone()))
            .retry_config(
                RetryConfig::standard()
                    .with_max_attempts(config.limits.max_attempts.max(1))
                    .with_initial_backoff(config.limits.backoff)
                    .with_max_backoff(MAX_BACKOFF),
            )
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(config.limits.connect_timeout)
                    .operation_attempt_timeout(config.limits.request_timeout)
                    .operation_timeout(budget)
                    .build(),
            );
        if let Some(e) = &endpoint {
            loader = loader.endpoint_url(e);
        }
        if let Some(c) = &config.credentials {
            loader = loader.credentials_provider(aws_sdk_kms::config::Credentials::new(
                c.access_key_id.clone(),
                c.secret_access_key.expose().to_owned(),
                c.session_token.as_ref().map(|t| t.expose().to_owned()),
                None,
                "envelope-static",
            ));
        }
        let sdk = loader.load().await;
        // aws-config also takes an endpoint from the shared config file (`endpoint_url` in the
        // profile, or in its `services` section for KMS): the same rule holds for it.
        if endpoint.is_none() {
            let key = aws_types::service_config::ServiceConfigKey::builder()
                .service_id("KMS")
                .env("AWS_ENDPOINT_URL")
                .profile("endpoint_url")
                .build()
                .map_err(|e| Error::config("the AWS endpoint configuration", e.to_string()))?;
            let configured = sdk
                .service_config()
                .and_then(|c| c.load_config(key))
                .or_else(|| sdk.endpoint_url().map(str::to_owned));
            if let Some(e) = configured {
                check_endpoint(&e, config.danger_allow_insecure_http)?;
            }
        }
        Ok(AwsKms {
            client: aws_sdk_kms::Client::new(&sdk),
            config,
            budget,
        })
    }

    /// The SDK client, for administrative calls (CreateKey, DisableKey, ...).
    pub fn client(&self) -> &aws_sdk_kms::Client {
        &self.client
    }

    /// Refuse a result unless `reported` (the key ARN a response names) is the key `requested`
    /// names. An alias cannot be checked here: AWS checked it against the `KeyId` sent.
    fn check_key(
        &self,
        action: &str,
        named_by: &str,
        requested: &str,
        reported: Option<&str>,
    ) -> std::result::Result<(), KmsError> {
        let Some(reported) = reported else {
            return Err(invalid_response(action, "response names no KeyId"));
        };
        if same_key(requested, reported) {
            return Ok(());
        }
        Err(
            KmsError::new(PROVIDER, KmsErrorKind::InvalidCiphertext).with_message(format!(
                "{action}: AWS used key {reported}, but {named_by} names key {requested}; refused"
            )),
        )
    }
}

/// Whether the key ARN `reported` is the key that `requested` (a key id, key ARN, alias name or
/// alias ARN) names, as far as can be told without asking AWS.
fn same_key(requested: &str, reported: &str) -> bool {
    if requested.starts_with("alias/") || requested.contains(":alias/") {
        return true;
    }
    if requested.starts_with("arn:") {
        return requested == reported;
    }
    reported == requested
        || reported
            .rsplit_once(":key/")
            .is_some_and(|(_, id)| id == requested)
}

fn check_endpoint(endpoint: &str, allow_insecure_http: bool) -> Result<()> {
    let bad = |why: &str| {
        Err(Error::config(
            format!("AWS endpoint {endpoint:?}"),
            why.to_owned(),
        ))
    };
    let (scheme, rest) = match endpoint.split_once("://") {
        Some((s, r)) if matches!(s, "http" | "https") && !r.is_empty() => (s, r),
        _ => return bad("must be an http(s) URL with a host"),
    };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let host = if let Some(v6) = host.strip_prefix('[') {
        v6.split(']').next().unwrap_or("")
    } else {
        host.split(':').next().unwrap_or("")
    };
    if host.is_empty() {
        return bad("must be an http(s) URL with a host");
    }
    if scheme == "http" && !is_loopback_host(host) && !allow_insecure_http {
        return bad(
            "is plain http to a host that is not a loopback address: KMS responses carry plaintext data keys, so use https (or set AwsConfig::danger_allow_insecure_http on a network you control)",
        );
    }
    Ok(())
}

/// Map an AWS error code (and its message) to the kind of failure it is.
pub(crate) fn classify(code: &str, message: &str) -> KmsErrorKind {
    match code {
        "AccessDeniedException"
        | "UnrecognizedClientException"
        | "InvalidSignatureException"
        | "IncompleteSignature"
        | "MissingAuthenticationToken"
        | "SignatureDoesNotMatch"
        | "InvalidClientTokenId"
        | "ExpiredTokenException"
        | "ExpiredToken" => KmsErrorKind::Auth,
        "DisabledException" => KmsErrorKind::KeyDisabled,
        "KMSInvalidStateException" if message.contains("pending deletion") => {
            KmsErrorKind::KeyPendingDeletion
        }
        "KMSInvalidStateException" => KmsErrorKind::KeyDisabled,
        "NotFoundException" => KmsErrorKind::KeyNotFound,
        "InvalidCiphertextException" | "IncorrectKeyException" => KmsErrorKind::InvalidCiphertext,
        "ThrottlingException" | "LimitExceededException" | "TooManyRequestsException" => {
            KmsErrorKind::Throttled
        }
        "KMSInternalException"
        | "DependencyTimeoutException"
        | "KeyUnavailableException"
        | "ServiceUnavailable"
        | "ServiceUnavailableException"
        | "InternalFailure" => KmsErrorKind::Unavailable,
        "ValidationException"
        | "InvalidKeyUsageException"
        | "InvalidArnException"
        | "InvalidGrantTokenException"
        | "UnsupportedOperationException"
        | "SerializationException" => KmsErrorKind::InvalidRequest,
        _ => KmsErrorKind::Other,
    }
}

/// A failed SDK call as a typed error, with AWS's code, message and request id.
fn sdk_error<E>(action: &str, e: SdkError<E>) -> KmsError
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    let request_id = e.request_id().map(str::to_owned);
    let kind = match &e {
        SdkError::ServiceError(_) => classify(e.code().unwrap_or(""), e.message().unwrap_or("")),
        SdkError::TimeoutError(_) => KmsErrorKind::Timeout,
        SdkError::DispatchFailure(d) if d.is_timeout() => KmsErrorKind::Timeout,
        SdkError::DispatchFailure(d) if d.is_user() => KmsErrorKind::InvalidRequest,
        // A connection refused, reset or closed mid-response: the SDK has already retried it.
        SdkError::DispatchFailure(_) => KmsErrorKind::Network,
        SdkError::ResponseError(_) => KmsErrorKind::InvalidResponse,
        _ => KmsErrorKind::Other,
    };
    // The SDK's error chain names the failure (no credentials, a refused connection) and never
    // carries a body: AWS error responses hold a code and a message only.
    let mut text: String = match (e.code(), e.message()) {
        (Some(code), Some(m)) => format!("{code}: {m}"),
        (Some(code), None) => code.to_owned(),
        _ => DisplayErrorContext(&e).to_string(),
    };
    text = text.chars().take(400).collect();
    // No credentials anywhere in the chain (or none that load) fails before any request.
    let kind = if !matches!(e, SdkError::ServiceError(_)) && text.contains("credentials") {
        KmsErrorKind::Auth
    } else {
        kind
    };
    let mut err = KmsError::new(PROVIDER, kind).with_message(format!("{action}: {text}"));
    if let Some(code) = e.code() {
        err = err.with_code(code.to_owned());
    }
    if let Some(id) = request_id {
        err = err.with_request_id(id);
    }
    err
}

fn invalid_response(action: &str, what: &str) -> KmsError {
    KmsError::new(PROVIDER, KmsErrorKind::InvalidResponse).with_message(format!("{action}: {what}"))
}

fn context_map(context: &EncryptionContext) -> HashMap<String, String> {
    context
        .iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

fn key_from_blob(action: &str, blob: Option<Blob>) -> std::result::Result<KeyMaterial, KmsError> {
    let bytes = Zeroizing::new(
        blob.ok_or_else(|| invalid_response(action, "response has no Plaintext"))?
            .into_inner(),
    );
    KeyMaterial::from_slice(&bytes)
        .map_err(|_| invalid_response(action, "Plaintext is not a 32-byte key"))
}

fn wrapped_from_blob(action: &str, blob: Option<Blob>) -> std::result::Result<Vec<u8>, KmsError> {
    blob.map(Blob::into_inner)
        .filter(|b| !b.is_empty())
        .ok_or_else(|| invalid_response(action, "response has no CiphertextBlob"))
}

#[async_trait]
impl KmsProvider for AwsKms {
    fn name(&self) -> &str {
        PROVIDER
    }

    fn call_budget(&self) -> Option<Duration> {
        Some(self.budget)
    }

    async fn generate_data_key(
        &self,
        cmk: &str,
        context: &EncryptionContext,
    ) -> std::result::Result<GeneratedDataKey, KmsError> {
        let action = "GenerateDataKey";
        let out = self
            .client
            .generate_data_key()
            .key_id(cmk)
            .key_spec(aws_sdk_kms::types::DataKeySpec::Aes256)
            .set_encryption_context(Some(context_map(context)))
            .send()
            .await
            .map_err(|e| sdk_error(action, e))?;
        let plaintext = key_from_blob(action, out.plaintext)?;
        self.check_key(action, "the keyring", cmk, out.key_id.as_deref())?;
        let wrapped = wrapped_from_blob(action, out.ciphertext_blob)?;
        Ok(GeneratedDataKey { plaintext, wrapped })
    }

    async fn decrypt(
        &self,
        cmk: &str,
        wrapped: &[u8],
        context: &EncryptionContext,
    ) -> std::result::Result<KeyMaterial, KmsError> {
        let action = "Decrypt";
        let out = self
            .client
            .decrypt()
            .key_id(cmk)
            .ciphertext_blob(Blob::new(wrapped))
            .set_encryption_context(Some(context_map(context)))
            .send()
            .await
            .map_err(|e| sdk_error(action, e))?;
        let key = key_from_blob(action, out.plaintext)?;
        self.check_key(action, "the key record", cmk, out.key_id.as_deref())?;
        Ok(key)
    }

    async fn encrypt(
        &self,
        cmk: &str,
        plaintext: &KeyMaterial,
        context: &EncryptionContext,
    ) -> std::result::Result<Vec<u8>, KmsError> {
        let action = "Encrypt";
        let out = self
            .client
            .encrypt()
            .key_id(cmk)
            .plaintext(Blob::new(plaintext.expose().as_slice()))
            .set_encryption_context(Some(context_map(context)))
            .send()
            .await
            .map_err(|e| sdk_error(action, e))?;
        self.check_key(action, "the keyring", cmk, out.key_id.as_deref())?;
        wrapped_from_blob(action, out.ciphertext_blob)
    }

    async fn re_encrypt(
        &self,
        wrapped: &[u8],
        source_cmk: &str,
        source_context: &EncryptionContext,
        destination_cmk: &str,
        destination_context: &EncryptionContext,
    ) -> std::result::Result<Vec<u8>, KmsError> {
        let action = "ReEncrypt";
        let out = self
            .client
            .re_encrypt()
            .ciphertext_blob(Blob::new(wrapped))
            .source_key_id(source_cmk)
            .set_source_encryption_context(Some(context_map(source_context)))
            .destination_key_id(destination_cmk)
            .set_destination_encryption_context(Some(context_map(destination_context)))
            .send()
            .await
            .map_err(|e| sdk_error(action, e))?;
        // Without the source check a substituted key would be laundered under the destination.
        self.check_key(
            action,
            "the key record",
            source_cmk,
            out.source_key_id.as_deref(),
        )?;
        self.check_key(
            action,
            "the destination",
            destination_cmk,
            out.key_id.as_deref(),
        )?;
        wrapped_from_blob(action, out.ciphertext_blob)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_are_classified() {
        use KmsErrorKind as K;
        for (code, message, kind) in [
            ("AccessDeniedException", "", K::Auth),
            ("UnrecognizedClientException", "", K::Auth),
            ("DisabledException", "key is disabled", K::KeyDisabled),
            (
                "KMSInvalidStateException",
                "arn:aws:kms:...:key/k is pending deletion.",
                K::KeyPendingDeletion,
            ),
            (
                "KMSInvalidStateException",
                "key is pending import",
                K::KeyDisabled,
            ),
            (
                "NotFoundException",
                "Key 'x' does not exist",
                K::KeyNotFound,
            ),
            ("InvalidCiphertextException", "", K::InvalidCiphertext),
            ("IncorrectKeyException", "", K::InvalidCiphertext),
            ("ThrottlingException", "Rate exceeded", K::Throttled),
            ("KMSInternalException", "", K::Unavailable),
            (
                "ValidationException",
                "1 validation error",
                K::InvalidRequest,
            ),
            ("SomethingNew", "", K::Other),
        ] {
            assert_eq!(classify(code, message), kind, "{code}");
        }
        assert!(classify("ThrottlingException", "").is_retryable());
        assert!(!classify("DisabledException", "").is_retryable());
    }

    #[test]
    fn reported_keys_are_checked_against_the_requested_one() {
        let arn = "arn:aws:kms:us-east-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab";
        assert!(same_key("1234abcd-12ab-34cd-56ef-1234567890ab", arn));
        assert!(same_key(arn, arn));
        assert!(same_key("alias/users", arn));
        assert!(same_key(
            "arn:aws:kms:us-east-1:123456789012:alias/users",
            arn
        ));
        assert!(!same_key("ffffffff-12ab-34cd-56ef-1234567890ab", arn));
        assert!(!same_key(
            "arn:aws:kms:eu-west-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab",
            arn
        ));
        assert!(!same_key("key/1234abcd", arn));
    }

    #[test]
    fn endpoints_are_checked() {
        for ok in [
            "https://kms.eu-west-1.amazonaws.com",
            "http://127.0.0.1:5999",
            "http://localhost:5999/",
            "http://[::1]:5999",
        ] {
            assert!(check_endpoint(ok, false).is_ok(), "{ok}");
        }
        for bad in [
            "http://10.0.0.1:5999",
            "http://kms.example.com",
            "ftp://x",
            "https://",
            "x",
        ] {
            let e = check_endpoint(bad, false).unwrap_err();
            assert!(e.to_string().contains(bad), "{e}");
        }
        assert!(check_endpoint("http://10.0.0.1:5999", true).is_ok());
    }

    #[test]
    fn budget_bounds_every_attempt_and_back_off() {
        let c = AwsConfig::new("us-east-1");
        // 3 x 2.5 s + 100 ms + 200 ms
        assert_eq!(c.budget(), Duration::from_millis(7800));
        assert!(c.budget() < crate::Policy::default().kms_timeout);
        let mut c = AwsConfig::new("us-east-1");
        c.limits.max_attempts = 0;
        assert_eq!(c.budget(), Duration::from_millis(2500));
    }

    #[test]
    fn debug_hides_static_secrets() {
        let c = AwsConfig::new("us-east-1").with_static_credentials(
            "AKIAEXAMPLE",
            SecretString::new("wJalrXUtnFEMI-secret"),
            Some(SecretString::new("session-token-secret")),
        );
        let dbg = format!("{c:?}");
        assert!(dbg.contains("AKIAEXAMPLE"), "{dbg}");
        assert!(
            !dbg.contains("wJalrXUtnFEMI-secret") && !dbg.contains("session-token-secret"),
            "{dbg}"
        );
    }
}
