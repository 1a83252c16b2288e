#![forbid(unsafe_code)]
// A test-support crate: a failed setup should panic loudly.
#![allow(clippy::expect_used, clippy::unwrap_used)]
//! Shared pieces for envelope's cross-crate tests: a KMS wrapper that counts calls and injects
//! latency, failures and hangs around any real provider.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use envelope_core::{
    EncryptionContext, GeneratedDataKey, KeyMaterial, Keyring, KmsError, KmsErrorKind, KmsProvider,
    LocalKms, MemoryKeyStore, Policy, async_trait,
};

/// Per-operation call counters.
#[derive(Debug, Default)]
pub struct Calls {
    /// GenerateDataKey calls.
    pub generate: AtomicU64,
    /// Decrypt calls.
    pub decrypt: AtomicU64,
    /// Encrypt calls.
    pub encrypt: AtomicU64,
}

impl Calls {
    /// Decrypt calls so far.
    pub fn decrypts(&self) -> u64 {
        self.decrypt.load(Ordering::SeqCst)
    }

    /// GenerateDataKey calls so far.
    pub fn generates(&self) -> u64 {
        self.generate.load(Ordering::SeqCst)
    }
}

/// Fault switches shared with the test.
#[derive(Debug, Default)]
pub struct Faults {
    /// Every call fails with a retryable "unavailable" error.
    pub fail: AtomicBool,
    /// Every call hangs forever.
    pub hang: AtomicBool,
    /// Delay in milliseconds before each call.
    pub delay_ms: AtomicU64,
}

/// Wraps a real provider: counts calls, and injects latency, failures or hangs on demand.
pub struct Instrumented<K> {
    inner: K,
    /// Call counters.
    pub calls: Arc<Calls>,
    /// Fault switches.
    pub faults: Arc<Faults>,
}

impl<K: KmsProvider> Instrumented<K> {
    /// Wrap `inner`.
    pub fn new(inner: K) -> Self {
        Instrumented {
            inner,
            calls: Arc::default(),
            faults: Arc::default(),
        }
    }

    async fn before(&self, counter: &AtomicU64) -> Result<(), KmsError> {
        counter.fetch_add(1, Ordering::SeqCst);
        let delay = self.faults.delay_ms.load(Ordering::SeqCst);
        if delay > 0 {
            tokio::time::sleep(Duration::from_millis(delay)).await;
        }
        if self.faults.hang.load(Ordering::SeqCst) {
            std::future::pending::<()>().await;
        }
        if self.faults.fail.load(Ordering::SeqCst) {
            return Err(KmsError::new("instrumented", KmsErrorKind::Unavailable)
                .with_message("injected failure"));
        }
        Ok(())
    }
}

#[async_trait]
impl<K: KmsProvider> KmsProvider for Instrumented<K> {
    fn name(&self) -> &str {
        self.inner.name()
    }

    async fn generate_data_key(
        &self,
        cmk: &str,
        context: &EncryptionContext,
    ) -> Result<GeneratedDataKey, KmsError> {
        self.before(&self.calls.generate).await?;
        self.inner.generate_data_key(cmk, context).await
    }

    async fn decrypt(
        &self,
        cmk: &str,
        wrapped: &[u8],
        context: &EncryptionContext,
    ) -> Result<KeyMaterial, KmsError> {
        self.before(&self.calls.decrypt).await?;
        self.inner.decrypt(cmk, wrapped, context).await
    }

    async fn encrypt(
        &self,
        cmk: &str,
        plaintext: &KeyMaterial,
        context: &EncryptionContext,
    ) -> Result<Vec<u8>, KmsError> {
        self.before(&self.calls.encrypt).await?;
        self.inner.encrypt(cmk, plaintext, context).await
    }
}

/// A local KMS wrapped for counting, a memory key store, and a keyring over them.
pub struct Fixture {
    /// The keyring.
    pub keyring: Keyring,
    /// The KMS as the keyring sees it.
    pub kms: Arc<dyn KmsProvider>,
    /// The CMK id.
    pub cmk: String,
    /// The shared key store.
    pub store: Arc<MemoryKeyStore>,
    /// Call counters.
    pub calls: Arc<Calls>,
    /// Fault switches.
    pub faults: Arc<Faults>,
}

impl Fixture {
    /// A fixture with the default policy.
    pub fn new() -> Self {
        Self::with_policy(Policy::default())
    }

    /// A fixture with `policy`.
    pub fn with_policy(policy: Policy) -> Self {
        let local = LocalKms::from_key(KeyMaterial::generate().expect("os randomness"));
        let cmk = local.cmk_id().to_owned();
        let kms = Instrumented::new(local);
        let calls = kms.calls.clone();
        let faults = kms.faults.clone();
        let kms: Arc<dyn KmsProvider> = Arc::new(kms);
        let store = Arc::new(MemoryKeyStore::new());
        let keyring = Keyring::builder(kms.clone(), store.clone())
            .cmk(cmk.clone())
            .policy(policy)
            .build()
            .expect("keyring");
        Fixture {
            keyring,
            kms,
            cmk,
            store,
            calls,
            faults,
        }
    }

    /// Another keyring over the same KMS and key store, with a cold cache: what a second
    /// application instance, or this one after a restart, sees.
    pub fn cold_keyring(&self, policy: Policy) -> Keyring {
        Keyring::builder(self.kms.clone(), self.store.clone())
            .cmk(self.cmk.clone())
            .policy(policy)
            .build()
            .expect("keyring")
    }
}

impl Default for Fixture {
    fn default() -> Self {
        Self::new()
    }
}

pub mod contract;
pub mod proxy;
pub mod replicas;
pub mod rows_bench;
pub mod scenarios;
pub mod servers;
pub mod store_contract;

/// The local provider as a contract target: master keys are made on demand; it has no disabled
/// or pending-deletion states.
pub struct LocalTarget {
    kms: Arc<LocalKms>,
}

impl LocalTarget {
    /// A local KMS holding several master keys, so rewrap has somewhere to go.
    pub fn new() -> Self {
        let mut kms = LocalKms::from_key(KeyMaterial::generate().expect("os randomness"));
        for _ in 0..3 {
            kms = kms.with_key(KeyMaterial::generate().expect("os randomness"));
        }
        LocalTarget { kms: Arc::new(kms) }
    }
}

impl Default for LocalTarget {
    fn default() -> Self {
        Self::new()
    }
}

static LOCAL_NEXT: AtomicU64 = AtomicU64::new(0);

#[async_trait]
impl contract::ContractTarget for LocalTarget {
    fn provider(&self) -> Arc<dyn KmsProvider> {
        self.kms.clone()
    }

    async fn new_cmk(&self) -> String {
        let ids: Vec<&str> = self.kms.cmk_ids().collect();
        let i = LOCAL_NEXT.fetch_add(1, Ordering::SeqCst) as usize % ids.len();
        ids[i].to_owned()
    }

    async fn disable(&self, _cmk: &str) -> bool {
        false
    }

    async fn enable(&self, _cmk: &str) {}

    async fn schedule_deletion(&self, _cmk: &str) -> bool {
        false
    }
}

/// The credentials the test emulators accept.
pub const EMULATOR_SECRET_ID: &str = "AKIDenvelopeTestSecretId000000000000";
/// The matching SecretKey.
pub const EMULATOR_SECRET_KEY: &str = "envelopeTestSecretKey0000000000000";

/// Tencent KMS against a fresh emulator of its own.
pub struct TencentTarget {
    /// The running emulator.
    pub emulator: envelope_kms_emulator::Emulator,
    /// The provider, pointed at it.
    pub kms: Arc<envelope_core::kms::tencent::TencentKms>,
}

impl TencentTarget {
    /// Start an emulator and a client for it.
    pub fn new() -> Self {
        Self::with_config(|c| c)
    }

    /// As [`TencentTarget::new`], adjusting the client configuration first.
    pub fn with_config(
        adjust: impl FnOnce(
            envelope_core::kms::tencent::TencentConfig,
        ) -> envelope_core::kms::tencent::TencentConfig,
    ) -> Self {
        use envelope_core::kms::tencent::{TencentConfig, TencentKms};
        let emulator = envelope_kms_emulator::Emulator::start(
            envelope_kms_emulator::EmulatorConfig::local(EMULATOR_SECRET_ID, EMULATOR_SECRET_KEY),
        )
        .expect("emulator starts");
        let config = TencentConfig::new(
            EMULATOR_SECRET_ID,
            envelope_core::SecretString::new(EMULATOR_SECRET_KEY),
            "ap-guangzhou",
        )
        .with_endpoint(emulator.endpoint());
        let kms = Arc::new(TencentKms::new(adjust(config)).expect("client"));
        TencentTarget { emulator, kms }
    }
}

impl Default for TencentTarget {
    fn default() -> Self {
        Self::new()
    }
}

#[async_trait]
impl contract::ContractTarget for TencentTarget {
    fn provider(&self) -> Arc<dyn KmsProvider> {
        self.kms.clone()
    }

    async fn new_cmk(&self) -> String {
        let alias = format!("contract-{}", LOCAL_NEXT.fetch_add(1, Ordering::SeqCst));
        self.kms
            .create_key(&alias, "contract suite")
            .await
            .expect("CreateKey")
            .key_id
    }

    async fn disable(&self, cmk: &str) -> bool {
        self.kms.disable_key(cmk).await.expect("DisableKey");
        true
    }

    async fn enable(&self, cmk: &str) {
        self.kms.enable_key(cmk).await.expect("EnableKey");
    }

    async fn schedule_deletion(&self, cmk: &str) -> bool {
        self.kms
            .schedule_key_deletion(cmk, 7)
            .await
            .expect("ScheduleKeyDeletion");
        true
    }
}

/// Announce a skipped test where `cargo test` shows it. The message goes straight to the
/// process's stderr, past the test harness's output capture, which would hide an `eprintln!`
/// from a test that then passes.
pub fn skipped(message: &str) {
    use std::io::Write as _;
    // Nothing useful can be done if stderr is closed.
    let _ = writeln!(std::io::stderr().lock(), "SKIPPED: {message}");
}
