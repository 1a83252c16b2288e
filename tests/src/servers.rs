//! The real KMS servers the providers are tested against: OpenBao (Vault Transit) and moto (AWS
//! KMS), found through `ENVELOPE_TEST_OPENBAO_URL` and `ENVELOPE_TEST_MOTO_URL`, and a TCP proxy
//! that can cut or stall the way to any of them.
//!
//! A variable that is not set skips the test loudly; a variable that is set to a server that
//! does not answer fails it.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use envelope_core::kms::aws::{AwsConfig, AwsKms};
use envelope_core::kms::vault::{VaultConfig, VaultKms};
use envelope_core::{KmsProvider, SecretString, async_trait};

use crate::contract::ContractTarget;

static NEXT: AtomicU64 = AtomicU64::new(0);

/// A name unique to this process and call.
pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::SeqCst)
    )
}

fn var(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// The OpenBao dev server's root token (`ENVELOPE_TEST_OPENBAO_TOKEN`, default `root`).
pub fn openbao_token() -> String {
    var("ENVELOPE_TEST_OPENBAO_TOKEN").unwrap_or_else(|| "root".to_owned())
}

/// The OpenBao server's URL, or `None` (announced as a skip) when the variable is unset.
pub fn openbao_url(test: &str) -> Option<String> {
    let url = var("ENVELOPE_TEST_OPENBAO_URL");
    if url.is_none() {
        crate::skipped(&format!(
            "{test}: ENVELOPE_TEST_OPENBAO_URL is not set (e.g. http://127.0.0.1:8299 for `bao server -dev -dev-root-token-id=root -dev-listen-address=127.0.0.1:8299`)"
        ));
    }
    url
}

/// The moto server's URL, or `None` (announced as a skip) when the variable is unset.
pub fn moto_url(test: &str) -> Option<String> {
    let url = var("ENVELOPE_TEST_MOTO_URL");
    if url.is_none() {
        crate::skipped(&format!(
            "{test}: ENVELOPE_TEST_MOTO_URL is not set (e.g. http://127.0.0.1:5999 for `moto_server -H 127.0.0.1 -p 5999`)"
        ));
    }
    url
}

/// The transit mount the tests use.
pub const TRANSIT_MOUNT: &str = "envelope-test-transit";

/// A Vault/OpenBao client for `address` with the test token and short timeouts.
pub fn vault_kms(address: &str) -> VaultKms {
    let mut c = VaultConfig::new(address, SecretString::new(openbao_token()));
    c.limits.request_timeout = Duration::from_millis(1500);
    c.limits.max_attempts = 2;
    c.limits.backoff = Duration::from_millis(50);
    VaultKms::new(c).expect("vault client")
}

/// Administrative calls to OpenBao that the provider does not make.
pub struct VaultAdmin {
    url: String,
    http: reqwest::Client,
}

impl VaultAdmin {
    /// An admin client for the server at `url`; enables the test transit mount if needed.
    pub async fn new(url: &str) -> Self {
        let admin = VaultAdmin {
            url: url.trim_end_matches('/').to_owned(),
            http: reqwest::Client::new(),
        };
        let (status, body) = admin
            .call(
                reqwest::Method::POST,
                &format!("sys/mounts/{TRANSIT_MOUNT}"),
                Some(serde_json::json!({"type": "transit"})),
            )
            .await;
        assert!(
            status < 300 || body.contains("already in use"),
            "enabling transit at {url}: HTTP {status}: {body}"
        );
        admin
    }

    /// `method /v1/{path}` with `body`; the status and body text. Panics when the server does
    /// not answer: a set URL must reach a running server.
    pub async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> (u16, String) {
        let mut r = self
            .http
            .request(method, format!("{}/v1/{path}", self.url))
            .header("X-Vault-Token", openbao_token());
        if let Some(body) = body {
            r = r
                .header("Content-Type", "application/json")
                .body(body.to_string());
        }
        let response = r.send().await.unwrap_or_else(|e| {
            panic!(
                "ENVELOPE_TEST_OPENBAO_URL={} is set but the server does not answer: {e}",
                self.url
            )
        });
        let status = response.status().as_u16();
        (status, response.text().await.unwrap_or_default())
    }

    /// Create a transit key; returns its `MOUNT/KEY` name.
    pub async fn new_key(&self, derived: bool) -> String {
        let name = unique("k");
        let (status, body) = self
            .call(
                reqwest::Method::POST,
                &format!("{TRANSIT_MOUNT}/keys/{name}"),
                Some(serde_json::json!({"type": "aes256-gcm96", "derived": derived})),
            )
            .await;
        assert!(status < 300, "creating key {name}: HTTP {status}: {body}");
        format!("{TRANSIT_MOUNT}/{name}")
    }
}

/// Vault Transit on the OpenBao server as a contract target.
pub struct VaultTarget {
    /// The provider.
    pub kms: Arc<VaultKms>,
    /// Administrative calls.
    pub admin: VaultAdmin,
}

impl VaultTarget {
    /// `None` (a loud skip) when `ENVELOPE_TEST_OPENBAO_URL` is unset.
    pub async fn from_env(test: &str) -> Option<Self> {
        let url = openbao_url(test)?;
        let admin = VaultAdmin::new(&url).await;
        Some(VaultTarget {
            kms: Arc::new(vault_kms(&url)),
            admin,
        })
    }
}

#[async_trait]
impl ContractTarget for VaultTarget {
    fn provider(&self) -> Arc<dyn KmsProvider> {
        self.kms.clone()
    }

    async fn new_cmk(&self) -> String {
        self.admin.new_key(false).await
    }

    fn unknown_cmk(&self) -> String {
        format!("{TRANSIT_MOUNT}/{}", unique("no-such-key"))
    }

    /// OpenBao's soft deletion: the key refuses every operation until restored.
    async fn disable(&self, cmk: &str) -> bool {
        let name = cmk.rsplit_once('/').expect("MOUNT/KEY").1;
        let (status, body) = self
            .admin
            .call(
                reqwest::Method::DELETE,
                &format!("{TRANSIT_MOUNT}/keys/{name}/soft-delete"),
                None,
            )
            .await;
        assert!(status < 300, "soft-deleting {cmk}: HTTP {status}: {body}");
        true
    }

    async fn enable(&self, cmk: &str) {
        let name = cmk.rsplit_once('/').expect("MOUNT/KEY").1;
        let (status, body) = self
            .admin
            .call(
                reqwest::Method::POST,
                &format!("{TRANSIT_MOUNT}/keys/{name}/soft-delete-restore"),
                None,
            )
            .await;
        assert!(status < 300, "restoring {cmk}: HTTP {status}: {body}");
    }

    /// Transit keys are deleted at once or not at all: no pending state.
    async fn schedule_deletion(&self, _cmk: &str) -> bool {
        false
    }
}

/// An AWS KMS client for the moto server at `endpoint`, with moto's static test credentials.
pub async fn aws_kms(endpoint: &str) -> AwsKms {
    let mut c = AwsConfig::new("us-east-1")
        .with_endpoint(endpoint)
        .with_static_credentials("testing", SecretString::new("testing"), None);
    c.limits.request_timeout = Duration::from_millis(1500);
    c.limits.max_attempts = 2;
    c.limits.backoff = Duration::from_millis(50);
    AwsKms::new(c).await.expect("aws client")
}

/// Create a symmetric key on `kms`'s server; its key id.
pub async fn aws_new_key(kms: &AwsKms) -> String {
    let out = kms
        .client()
        .create_key()
        .description("envelope tests")
        .send()
        .await
        .unwrap_or_else(|e| {
            panic!(
                "CreateKey on moto failed (is ENVELOPE_TEST_MOTO_URL a running moto_server?): {}",
                aws_sdk_kms::error::DisplayErrorContext(&e)
            )
        });
    out.key_metadata.expect("KeyMetadata").key_id
}

/// AWS KMS on the moto server as a contract target.
pub struct AwsTarget {
    /// The provider.
    pub kms: Arc<AwsKms>,
}

impl AwsTarget {
    /// `None` (a loud skip) when `ENVELOPE_TEST_MOTO_URL` is unset.
    pub async fn from_env(test: &str) -> Option<Self> {
        let url = moto_url(test)?;
        Some(AwsTarget {
            kms: Arc::new(aws_kms(&url).await),
        })
    }
}

#[async_trait]
impl ContractTarget for AwsTarget {
    fn provider(&self) -> Arc<dyn KmsProvider> {
        self.kms.clone()
    }

    async fn new_cmk(&self) -> String {
        aws_new_key(&self.kms).await
    }

    /// moto accepts DisableKey but keeps using the key (docs/PROVIDERS.md): the disabled state
    /// cannot be shown against it. The error mapping is unit-tested instead.
    async fn disable(&self, _cmk: &str) -> bool {
        false
    }

    async fn enable(&self, _cmk: &str) {}

    /// As for `disable`: moto does not enforce pending deletion.
    async fn schedule_deletion(&self, _cmk: &str) -> bool {
        false
    }
}
